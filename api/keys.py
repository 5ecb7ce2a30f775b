"""Create secrets for the configuration.

    python -m api.keys new --scope admin --name ops     # a new API key and the entry for FACE_API_KEYS
    python -m api.keys store-key                        # a key for FACE_STORE_ENCRYPTION_KEY

The plain API key is printed once and never stored; the service keeps only its sha256.
"""

from __future__ import annotations

import argparse
import json
import secrets

from api.security import SCOPES, hash_key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m api.keys", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="create an API key")
    new.add_argument("--scope", choices=SCOPES, required=True)
    new.add_argument("--name", default=None, help="who the key is for (appears in the audit log)")
    commands.add_parser("store-key", help="create an encryption key for the store")
    args = parser.parse_args(argv)

    if args.command == "new":
        key = secrets.token_urlsafe(32)
        entry = {
            "name": args.name or f"{args.scope}-{secrets.token_hex(3)}",
            "scope": args.scope,
            "sha256": hash_key(key),
        }
        print(f"API key (give it to the client; it is not stored anywhere): {key}")
        print(f"Entry for FACE_API_KEYS (a JSON list of such entries): {json.dumps(entry)}")
    else:
        from cryptography.fernet import Fernet

        print(f"FACE_STORE_ENCRYPTION_KEY={Fernet.generate_key().decode()}")


if __name__ == "__main__":
    main()
