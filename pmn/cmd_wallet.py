"""`pmn wallet new|show`."""

from __future__ import annotations

import argparse

from pmn.wallet import create_keystore, read_password, show_keystore, unlock_keystore


def cmd_wallet_new(args: argparse.Namespace) -> int:
    password = read_password(args.password_file, confirm=True)
    info = create_keystore(args.keystore.expanduser(), password, overwrite=args.force)
    print(f"created {info.path}")
    print(f"address {info.address}")
    return 0


def cmd_wallet_show(args: argparse.Namespace) -> int:
    path = args.keystore.expanduser()
    info = show_keystore(path)
    if args.check:
        account = unlock_keystore(path, read_password(args.password_file))
        print(f"address {account.address} (password ok)")
    else:
        print(f"address {info.address}")
    return 0
