"""The worker's sandbox: one module per layer, applied in `policy.LAYERS` order.

The runner imports `policy` (limits, required layers), `environment` (the
worker's clean environment), `options` (the command-line policy) and `cgroups`
(its side of the cgroup layer). `bootstrap` is the worker's side:
it imports the Landlock and seccomp bindings and applies every layer before
any submission code loads. Nothing here imports grpc, smp, transport or
anything holding a key.
"""
