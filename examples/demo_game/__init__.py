"""The example game a coordinator defines: participants implement TrackerBase."""
