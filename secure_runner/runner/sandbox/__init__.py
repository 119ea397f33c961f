"""The worker's sandbox: one module per layer, applied in `policy.LAYERS` order.

`policy` (limits, required layers) is all the runner imports; `cgroups` also
has the runner's side of the cgroup layer. `bootstrap` is the worker's side:
it imports the Landlock and seccomp bindings and applies every layer before
any submission code loads. Nothing here imports grpc, smp, transport or
anything holding a key.
"""
