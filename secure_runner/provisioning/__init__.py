"""Provisioning: each party makes its own keys on its own machine; only public material travels.

One module per role, each with its `secure-runner pki <role> ...` commands:

* `ca`              the crunch operator: creates the CA, signs CSRs under its policy
                    (the identity comes from the operator's approval, never from the CSR),
                    renews, logs every issuance. Holds `ca.key`, and nothing else secret.
* `coordinator`     a coordinator (and, with the same commands, an operator): its Ed25519
                    token-signing key and P-256 TLS key, a CSR, the certificate installed,
                    rotation with an overlap.
* `cruncher`        a cruncher: its identity key or Solana wallet, delegations it signs
                    for its runners' TLS keys.
* `runner_host`     the host of the orchestrator and its runners: their TLS keys and CSRs,
                    the certificates and the crunchers' delegations it installs.
* `registry_builder` the registry, from the parties' public files.

`certs` holds what every party does with X.509 (CSRs, path validation of what it is
given); `public` the strict public-material files. `secure-runner pki init` (pki.py) is all
of these steps run for every party in one folder: the demo's test PKI.
"""
