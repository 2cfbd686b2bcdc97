"""``tensafe artifact ...``, ``tensafe audit verify`` and ``tensafe receipt verify``: offline tools.

They work on a trainer's data folder (``--home``) or on files a user downloaded (``pull_artifact`` bytes,
an exported adapter and its receipt), with the tenant's key set from the home or given as a file
(``--keys``: a key-set file, or the tenant's key Secret exported with ``kubectl get secret -o yaml``).
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path
from typing import Optional

from tg_tinker.errors import TGTinkerError, ValidationError

from .artifacts import ARTIFACT_ID, ArtifactStore, write_private
from .audit import parse_head, verify
from tg_tinker.keys import KeyProvider, LocalKeyProvider, StaticKeyProvider, chain_key_of, load_keyset_file
from .paths import keys_dir, tensafe_home

RECEIPT_FILE = "tensafe-receipt.json"


def open_store(home: Path | None) -> ArtifactStore:
    home = home or tensafe_home()
    return ArtifactStore(home / "artifacts", LocalKeyProvider(keys_dir(home)))


def _keys(args, tenant: Optional[str] = None) -> tuple[str, KeyProvider]:
    """(tenant, key provider): a key set given with --keys, else the home's keys folder."""
    if getattr(args, "keys", None):
        found, keyset = load_keyset_file(args.keys, tenant or args.tenant)
        return found, StaticKeyProvider(found, keyset)
    return tenant or args.tenant or "default", LocalKeyProvider(keys_dir(args.home or tensafe_home()))


def read_artifact(args) -> bytes:
    """The decrypted payload of ``args.source``: a file of stored (encrypted) bytes, or an artifact id in the
    home's store. A file names its own tenant and artifact id in its header."""
    from . import crypto

    source = Path(args.source)
    if source.is_file():
        data = source.read_bytes()
        header, _ = crypto.read_header(io.BytesIO(data))
        if args.tenant and header["tenant"] != args.tenant:
            raise ValidationError(f"{source} belongs to tenant {header['tenant']!r}, not {args.tenant!r}")
        tenant, keys = _keys(args, header["tenant"])
        return crypto.decrypt_from(io.BytesIO(data), len(data), crypto.Binding(tenant, "", header["artifact_id"]),
                                   keys)
    if not ARTIFACT_ID.fullmatch(args.source):
        raise ValidationError(f"{args.source!r} is neither a file nor an artifact id (art-<32 hex digits>)",
                              {"source": args.source})
    tenant, keys = _keys(args)
    return ArtifactStore((args.home or tensafe_home()) / "artifacts", keys).get(tenant, args.source)


def export_adapter_folder(payload: bytes, out: Path) -> list[str]:
    """Write a decrypted checkpoint or sampler artifact as a PEFT adapter folder."""
    from tg_tinker.config import TrainingConfig

    from .engine import TrainingEngine, deserialize_state

    state = deserialize_state(payload)
    config = TrainingConfig.parse(state["config"]).model_copy(update={"dp_config": None})
    engine = TrainingEngine(config)
    engine.load_weights(state)
    return engine.export_adapter(out)


def shred_tenant(home: Path, tenant: str) -> int:
    """Keys, artifacts, index entries and the tenant's audit chain (unverifiable once its key is gone). The
    privacy ledgers stay: spent budget is never given back."""
    store = open_store(home)
    removed = store.shred(tenant)
    log = home / "audit" / f"{tenant}.jsonl"
    if log.exists():
        log.unlink()
        removed += 1
        from .artifacts import fsync_dir

        fsync_dir(log.parent)
    return removed


def artifact_command(args) -> int:
    try:
        if args.artifact_command == "list":
            for info in open_store(args.home).list(args.tenant):
                print(f"{info.artifact_id}  {info.kind:10}  step {info.step:6}  {info.size_bytes:12} B  "
                      f"{info.training_client_id}  key {info.key_id}")
        elif args.artifact_command == "decrypt":
            write_private(args.out, read_artifact(args))
            print(f"decrypted {args.source} -> {args.out} (a torch checkpoint: load with weights_only=True)")
        elif args.artifact_command == "export":
            files = export_adapter_folder(read_artifact(args), args.out)
            print(f"exported {args.source} -> {args.out}: {', '.join(files)}")
        elif args.artifact_command == "rotate":
            kid, retired = open_store(args.home).rotate(args.tenant, reencrypt=args.reencrypt)
            if args.reencrypt:
                print(f"tenant {args.tenant}: new key {kid}; every artifact re-encrypted under a fresh data key; "
                      f"retired keys destroyed: {', '.join(retired) or 'none'}")
            else:
                print(f"tenant {args.tenant}: new key {kid}; every data key re-wrapped (old keys kept: copies "
                      "taken before still decrypt; use --reencrypt to retire them)")
        elif args.artifact_command == "shred":
            if not args.yes:
                print("refusing to shred without --yes: the tenant's artifacts become unreadable forever",
                      file=sys.stderr)
                return 2
            removed = shred_tenant(args.home or tensafe_home(), args.tenant)
            print(f"tenant {args.tenant}: keys deleted, {removed} files removed; its artifacts can no longer be "
                  "decrypted anywhere")
    except TGTinkerError as exc:
        print(f"error: {type(exc).__name__}: {exc.message}", file=sys.stderr)
        return 1
    return 0


def audit_command(args) -> int:
    home = args.home or tensafe_home()
    path = args.path or home / "audit" / f"{args.tenant}.jsonl"
    try:
        tenant, keys = _keys(args, args.tenant)
        keyset = keys._load(tenant)
        if keyset is None or "audit" not in keyset:
            raise ValidationError(f"no audit key for tenant {tenant!r}: the chain cannot be verified without it "
                                  "(give the key set with --keys)")
        expect = parse_head(args.expect_head) if args.expect_head else None
    except (TGTinkerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not Path(path).is_file():
        print(f"error: no audit log at {path} (tenant {tenant!r}): nothing to verify, or it was deleted",
              file=sys.stderr)
        return 1
    ok, _, message = verify(path, chain_key_of(keyset), expect)
    print(f"{path}: {message}")
    return 0 if ok else 1


def receipt_command(args) -> int:
    from tg_tinker.receipts import verify_receipt

    source = Path(args.file)
    receipt_path = source / RECEIPT_FILE if source.is_dir() else source
    try:
        claims = verify_receipt(receipt_path.read_text(), Path(args.public_key).read_text())
    except (TGTinkerError, OSError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    content = args.artifact or (source / "adapter_model.safetensors" if source.is_dir() else None)
    checks = [(content, "content_hash")] if content is not None else []
    if source.is_dir() and claims.get("adapter_config_hash"):
        checks.append((source / "adapter_config.json", "adapter_config_hash"))
    for path, claim in checks:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        if digest != claims.get(claim):
            print(f"error: {path} has SHA-256 {digest}, the receipt is for {claims.get(claim)} ({claim})",
                  file=sys.stderr)
            return 1
    if content:
        print(f"receipt verifies: {receipt_path} and matches {content}")
    else:  # a valid signature says nothing of the file you hold until its bytes are hashed
        print(f"receipt signature verifies: {receipt_path}; NO artifact was checked against its content_hash "
              "(pass --artifact FILE, or verify an exported adapter folder)")
    for key in sorted(claims):
        print(f"  {key}: {claims[key]}")
    return 0
