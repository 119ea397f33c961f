"""Registry adapters: they build the `smp.registry.Registry` value the rules read.

The embedded default is the JSON file (`transport.registry_file`). `chain` reads the same
identities from Solana accounts over JSON-RPC (`solana_accounts` decodes them, `mapping`
maps them onto the protocol) and `enrolment` accepts the reference's wallet-signed
enrolment message as a runner delegation. These modules need the optional `chain` extra
(`pip install 'secure-runner[chain]'`: solders for base58 and program-derived addresses,
httpx for the RPC).
"""
