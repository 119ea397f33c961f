"""Create a test or local PKI for secure-runner (same as `secure-runner pki`).

Usage:

    python pki/make_pki.py init OUT --crunch CRUNCH_ID \
        [--model MODEL_ID[:NAME[:CRUNCHER_ID[:CRUNCHER_NAME]]] ...] \
        [--days 7] [--ca-days 30] [--force]

Example:

    python pki/make_pki.py init pki/out --crunch c1 --model m1:Model One:alice:Alice

writes OUT/ca.crt and ca.key, coordinator/{tls.crt,tls.key,identity.key},
orchestrator/{tls.crt,tls.key}, runners/<model>/{tls.crt,tls.key},
crunchers/<cruncher>/identity.key and registry.json. Private keys are mode 0600.
Exit status 0 on success, 2 (with a one-line message on stderr) on any error.
"""

import sys

from secure_runner.pki import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
