"""The ``tensafe`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _serve(args) -> int:
    from tensafe_trainer.cli.serve import run

    run(args.host, args.port, args.home, args.ready_file, args.parent_pid, args.insecure_no_auth,
        args.client_config, args.log_level, args.tls_cert, args.tls_key, args.open_docs, args.privacy_policy,
        allow_keys_in_home=args.allow_keys_in_home)
    return 0


def _holds_keys() -> None:
    """Before a command reads a key set: no core dump may carry it (hardening.py)."""
    from tensafe_trainer.cli.hardening import disable_core_dumps

    disable_core_dumps()


def _tinker_key(args) -> int:
    _holds_keys()
    import time

    from tg_tinker.errors import TGTinkerError

    from tensafe_trainer.storage.paths import tensafe_home
    from tensafe_trainer.service.tinker.keys import create_key, list_keys, revoke_key

    def shown(value, width: int) -> str:  # an entry's fields may be planted: no control characters, bounded
        text = "".join(c if c.isprintable() else "?" for c in str(value))
        return text if len(text) <= width else text[:width - 1] + "~"

    try:
        if args.tinker_key_command == "create":
            key = create_key(args.home or tensafe_home(), args.tenant, args.name)
            print(key)  # shown once: only its digest is kept
            return 0
        # list and revoke read a home, never create one (nor a key store)
        home = args.home or Path(os.environ.get("TENSAFE_HOME") or Path.home() / ".cache" / "tensafe")
        if args.tinker_key_command == "list":
            listed = list_keys(home, args.tenant)
            for k in listed:
                created = k["created_at"]
                created = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(created)) \
                    if isinstance(created, (int, float)) and 0 <= created < 1e11 else "?"
                status = "" if k["status"] == "valid" else f"  [{k['status'].upper()}]"
                print(f"{shown(k['key_id'], 16):16}  {shown(k['tenant_id'], 24):24}  {created}  "
                      f"{shown(k['name'], 40)}{status}")
            if not listed:
                print("no Tinker keys" + (f" of tenant {shown(args.tenant, 64)}" if args.tenant else ""))
        else:
            revoked = revoke_key(home, args.key_id)
            print(f"revoked Tinker key {args.key_id} of tenant {shown(revoked[0].get('tenant_id'), 64)}: refused "
                  "from now on, even if an old copy of the key file is put back")
    except TGTinkerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.strerror or type(exc).__name__}: {exc.filename}", file=sys.stderr)
        return 1
    return 0


def _demo(args) -> int:
    from tensafe_trainer.cli.demo import run_demo

    return run_demo(steps=args.steps, out=args.out, dp=args.dp, model_ref=args.model)


def _artifact(args) -> int:
    _holds_keys()
    from tensafe_trainer.cli.admin import artifact_command

    return artifact_command(args)


def _audit(args) -> int:
    _holds_keys()
    from tensafe_trainer.cli.admin import audit_command

    return audit_command(args)


def _receipt(args) -> int:
    from tensafe_trainer.cli.admin import receipt_command

    return receipt_command(args)


def _dev_cluster(args) -> int:
    try:
        from tensafe_devcluster.cli import run
    except ImportError as error:
        print("tensafe dev-cluster needs the test cluster, a package of its own (test infrastructure): "
              f"`make setup`, or pip install 'tensafe[operator,dev]' -e tests/support ({error})", file=sys.stderr)
        return 2
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensafe", description="TenSafe: private fine-tuning service")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the trainer server (bearer token from the file $TENSAFE_AUTH_TOKEN_FILE "
                                         "names, or $TENSAFE_AUTH_TOKEN)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    serve.add_argument("--home", type=Path, default=None, help="data folder (default $TENSAFE_HOME)")
    serve.add_argument("--ready-file", type=Path, default=None, help="write host/port here once listening")
    serve.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    serve.add_argument("--client-config", type=Path, default=None,
                       help="JSON CreateTrainingClient to start at boot (else $TENSAFE_CLIENT_CONFIG)")
    serve.add_argument("--insecure-no-auth", action="store_true", help="accept requests without a token")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--tls-cert", type=Path, default=os.environ.get("TENSAFE_TLS_CERT"),
                       help="serve HTTPS with this certificate (PEM; default $TENSAFE_TLS_CERT)")
    serve.add_argument("--tls-key", type=Path, default=os.environ.get("TENSAFE_TLS_KEY"),
                       help="its private key (PEM; default $TENSAFE_TLS_KEY)")
    serve.add_argument("--open-docs", action="store_true",
                       help="serve /docs, /redoc and /openapi.json without a token (default: they need one)")
    serve.add_argument("--privacy-policy", type=Path, default=os.environ.get("TENSAFE_PRIVACY_POLICY"),
                       help="the Tinker API's DP policy: JSON/YAML mapping a tenant id (or 'default') to "
                            "{dp: {DPConfig fields}, batch_size: N} (default $TENSAFE_PRIVACY_POLICY)")
    serve.add_argument("--allow-keys-in-home", action="store_true",
                       help="start even though the key sets lie inside the data folder: then whoever copies the "
                            "home (a backup, a snapshot) can decrypt every artifact and dataset in it")
    serve.set_defaults(func=_serve)

    tkey = sub.add_parser("tinker-key", help="API keys of the Tinker API (/api/v1): each opens one tenant")
    tksub = tkey.add_subparsers(dest="tinker_key_command", required=True)
    tcreate = tksub.add_parser("create", help="create a key (printed once; only its SHA-256 is stored)")
    tcreate.add_argument("--tenant", default="default")
    tcreate.add_argument("--name", default="", help="a label for the key")
    tcreate.add_argument("--home", type=Path, default=None, help="the trainer's data folder (default $TENSAFE_HOME)")
    tlist = tksub.add_parser("list", help="list the keys: key id, tenant, created, name (never a key)")
    tlist.add_argument("--tenant", default=None, help="only this tenant's keys")
    tlist.add_argument("--home", type=Path, default=None, help="the trainer's data folder (default $TENSAFE_HOME)")
    trevoke = tksub.add_parser("revoke", help="revoke a key for good (kept in the key store's revocation list, so "
                                              "an old copy of the key file put back does not bring it back)")
    trevoke.add_argument("key_id", help="the key id `tensafe tinker-key list` shows (16 hex digits)")
    trevoke.add_argument("--home", type=Path, default=None, help="the trainer's data folder (default $TENSAFE_HOME)")
    tkey.set_defaults(func=_tinker_key)

    demo = sub.add_parser("demo", help="fine-tune SmolLM2-135M with LoRA on the bundled dataset")
    demo.add_argument("--steps", type=int, default=30)
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    demo.add_argument("--dp", action="store_true", help="train with DP-SGD and report epsilon")
    demo.add_argument("--model", default="smollm2-135m")
    demo.set_defaults(func=_demo)

    artifact = sub.add_parser("artifact", help="inspect, decrypt and re-key stored artifacts")
    asub = artifact.add_subparsers(dest="artifact_command", required=True)
    for name, text in (("list", "list a tenant's artifacts"),
                       ("decrypt", "decrypt an artifact (an id in --home, or a file of pulled bytes)"),
                       ("export", "write a PEFT adapter folder from an artifact (id or pulled file)"),
                       ("rotate", "rotate the tenant key: re-wrap every data key, or --reencrypt and retire"),
                       ("shred", "delete the tenant's keys, artifacts and audit chain: nothing stays readable")):
        p = asub.add_parser(name, help=text)
        p.add_argument("--home", type=Path, default=None)
        p.add_argument("--tenant", default=None if name in ("decrypt", "export") else "default",
                       help="the tenant (a pulled file names its own)")
        if name in ("decrypt", "export"):
            p.add_argument("source", help="an artifact id (art-...) in --home, or a file saved from pull_artifact")
            p.add_argument("--out", type=Path, required=True)
            p.add_argument("--keys", type=Path, default=None,
                           help="the tenant's key set: a key-set file, or its key Secret as JSON/YAML "
                                "(default: the home's keys)")
            p.add_argument("--artifact-keys", type=Path, default=None,
                           help="with --keys: the folder of the artifacts' data keys (default: the home's; on "
                                "Kubernetes, a copy of the trainer's keys volume)")
        if name == "rotate":
            p.add_argument("--reencrypt", action="store_true",
                           help="re-encrypt every artifact under a fresh data key and the new key, then destroy "
                                "the retired keys (a copy taken before no longer decrypts)")
        if name == "shred":
            p.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")
    artifact.set_defaults(func=_artifact)

    audit = sub.add_parser("audit", help="the audit log")
    ausub = audit.add_subparsers(dest="audit_command", required=True)
    verify = ausub.add_parser("verify", help="check a tenant's keyed chain; report the first broken link")
    verify.add_argument("path", type=Path, nargs="?", default=None,
                        help="default: $TENSAFE_HOME/audit/<tenant>.jsonl")
    verify.add_argument("--tenant", default="default")
    verify.add_argument("--home", type=Path, default=None)
    verify.add_argument("--keys", type=Path, default=None, help="the tenant's key set file or key Secret export")
    verify.add_argument("--expect-head", default=None, metavar="SEQUENCE:RECORD_HASH",
                        help="a head published earlier (save results, receipts, client status): a log that "
                             "ends before it was truncated")
    audit.set_defaults(func=_audit)

    receipt = sub.add_parser("receipt", help="privacy receipts")
    rsub = receipt.add_subparsers(dest="receipt_command", required=True)
    rverify = rsub.add_parser("verify", help="check a receipt's signature offline and print its claims")
    rverify.add_argument("file", help="a receipt JSON file, or an exported adapter folder holding one")
    rverify.add_argument("--public-key", required=True, help="PEM file (ServiceClient.receipt_public_key())")
    rverify.add_argument("--artifact", type=Path, default=None,
                         help="also check this file's SHA-256 against the receipt's content_hash "
                              "(default for a folder: its adapter_model.safetensors)")
    receipt.set_defaults(func=_receipt)

    dev = sub.add_parser("dev-cluster", help="run the test cluster (Kubernetes API emulator + local kubelet + "
                         "operator) in the foreground")
    dev.add_argument("--kubeconfig", type=Path, required=True, help="write the cluster's kubeconfig here")
    dev.add_argument("--root", type=Path, default=None, help="state folder (volumes, pod logs); default: temporary")
    dev.add_argument("--port", type=int, default=0, help="API server port (default: a free one)")
    dev.add_argument("--no-operator", action="store_true", help="run no operator (run your own against it)")
    dev.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu the local node offers (default 0)")
    dev.set_defaults(func=_dev_cluster)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
