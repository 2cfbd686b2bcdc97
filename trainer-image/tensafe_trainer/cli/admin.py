"""``tensafe artifact ...``, ``tensafe audit verify`` and ``tensafe receipt verify``: offline tools.

They work on a trainer's data folder (``--home``) or on files a user downloaded (``pull_artifact`` bytes,
an exported adapter and its receipt), with the tenant's key set from the home or given as a file
(``--keys``: a key-set file, or the tenant's key Secret exported with ``kubectl get secret -o yaml``).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path
from typing import Optional

from tg_tinker.errors import ArtifactNotFoundError, TGTinkerError, ValidationError

from tensafe_trainer.storage.artifacts import ARTIFACT_ID, ArtifactStore, write_private
from tensafe_trainer.storage.audit import parse_head, verify
from tensafe_keys.store import KeyProvider, StaticKeyProvider, load_keyset_file
from tensafe_trainer.storage.paths import artifact_keys_dir, key_provider, keys_dir, tensafe_home

RECEIPT_FILE = "tensafe-receipt.json"
EXPORTABLE = ("checkpoint", "sampler")  # artifact kinds that hold model weights (a dataset holds examples)


def _home(args, must_exist: bool = True) -> Path:
    """``--home``, else $TENSAFE_HOME (else paths.tensafe_home's default), never created: these commands read a
    trainer's folder, and one that is not there is an error, not a new empty home."""
    home = args.home or Path(os.environ.get("TENSAFE_HOME") or Path.home() / ".cache" / "tensafe")
    if must_exist and not Path(home).is_dir():
        raise ValidationError(f"no trainer data folder at {home} (give --home, or set TENSAFE_HOME)",
                              {"field": "home"})
    return Path(home)


def open_store(home: Path | None) -> ArtifactStore:
    home = home or tensafe_home()
    return ArtifactStore(home / "artifacts", key_provider(home))


def _keys(args, tenant: Optional[str] = None) -> tuple[str, KeyProvider]:
    """(tenant, key provider): a key set given with --keys, else the home's keys folder."""
    if getattr(args, "keys", None):
        found, keyset = load_keyset_file(args.keys, tenant or args.tenant)
        return found, StaticKeyProvider(found, keyset, getattr(args, "artifact_keys", None)
                                        or artifact_keys_dir(_home(args, must_exist=False)))
    folder = keys_dir(_home(args, must_exist=False))
    if not folder.is_dir():  # never created here: a read finds no keys where there are none
        raise ValidationError(f"no key sets at {folder}: give the tenant's key set with --keys", {"field": "keys"})
    return tenant or args.tenant or "default", key_provider(_home(args, must_exist=False))


def read_artifact(args) -> tuple[bytes, str]:
    """The decrypted payload of ``args.source`` and its kind: a file of stored (encrypted) bytes, or an artifact
    id in the home's store. A file names its own tenant and artifact id in its header."""
    from tensafe_trainer.storage import crypto
    source = Path(args.source)
    if source.is_file():
        data = source.read_bytes()
        header, _ = crypto.read_header(io.BytesIO(data))
        if args.tenant and header["tenant"] != args.tenant:
            raise ValidationError(f"{source} belongs to tenant {header['tenant']!r}, not {args.tenant!r}")
        tenant, keys = _keys(args, header["tenant"])
        payload, description = crypto.decrypt_with_description(
            io.BytesIO(data), len(data), crypto.Binding(tenant, "", header["artifact_id"]), keys)
        return payload, description["kind"]
    if not ARTIFACT_ID.fullmatch(args.source):
        raise ValidationError(f"{args.source!r} is neither a file nor an artifact id (art-<32 hex digits>)",
                              {"source": args.source})
    tenant, keys = _keys(args)
    if not (_home(args) / "artifacts").is_dir():
        raise ArtifactNotFoundError(f"no artifact {args.source} in {_home(args)}: it holds no artifacts",
                                    {"artifact_id": args.source})
    store = ArtifactStore(_home(args) / "artifacts", keys)
    return store.get(tenant, args.source), store.info(tenant, args.source).kind


def export_adapter_folder(payload: bytes, out: Path) -> list[str]:
    """Write a decrypted checkpoint or sampler artifact as a PEFT adapter folder."""
    from tg_tinker.config import TrainingConfig

    from tensafe_trainer.engine.adapter import AdapterSlot, deserialize_state

    state = deserialize_state(payload)
    config = TrainingConfig.parse(state["config"]).model_copy(update={"dp_config": None})
    engine = AdapterSlot(config)
    engine.load_weights(state)
    return engine.export_adapter(out)


def shred_tenant(home: Path, tenant: str) -> int:
    """Keys, artifacts, index entries and the tenant's audit chain (unverifiable once its key is gone), and its
    Tinker API keys, revoked first (service/tinker/keys.py: an old copy of the key file put back opens nothing). The
    privacy ledgers stay: spent budget is never given back."""
    from tensafe_trainer.service.tinker.keys import revoke_tenant_keys

    store = open_store(home)
    revoke_tenant_keys(home, tenant, store.keys)
    removed = store.shred(tenant)
    log = home / "audit" / f"{tenant}.jsonl"
    if log.exists():
        log.unlink()
        removed += 1
        from tensafe_keys.private_files import fsync_dir

        fsync_dir(log.parent)
    return removed


def artifact_command(args) -> int:
    try:
        if args.artifact_command == "list":
            home = _home(args)
            _keys(args)  # a home without keys lists nothing readable: say so, and create no keys folder
            for info in (open_store(home).list(args.tenant) if (home / "artifacts").is_dir() else ()):
                print(f"{info.artifact_id}  {info.kind:10}  step {info.step:6}  {info.size_bytes:12} B  "
                      f"{info.training_client_id}  key {info.key_id}")
        elif args.artifact_command == "decrypt":
            write_private(args.out, read_artifact(args)[0])
            print(f"decrypted {args.source} -> {args.out} (a torch checkpoint: load with weights_only=True)")
        elif args.artifact_command == "export":
            payload, kind = read_artifact(args)
            if kind not in EXPORTABLE:
                raise ValidationError(f"{args.source} is a {kind} artifact: only {' and '.join(EXPORTABLE)} "
                                      "artifacts hold an adapter to export (`tensafe artifact decrypt` writes any "
                                      "artifact's contents)", {"kind": kind})
            files = export_adapter_folder(payload, args.out)
            print(f"exported {args.source} -> {args.out}: {', '.join(files)}")
        elif args.artifact_command == "rotate":
            # Everything a leaked key set holds: the KEKs, then the audit, receipt and sealing secrets (audit.py:
            # the chain gets a new segment; the old receipt key's private half is destroyed, its public half kept).
            home = _home(args)
            store = open_store(home)
            kid, retired = store.rotate(args.tenant, reencrypt=args.reencrypt)
            if args.reencrypt:
                print(f"tenant {args.tenant}: new key {kid}; every artifact re-encrypted under a fresh data key; "
                      f"retired keys destroyed: {', '.join(retired) or 'none'}")
            else:
                print(f"tenant {args.tenant}: new key {kid}; every data key re-wrapped (old keys kept: copies "
                      "taken before still decrypt; use --reencrypt to retire them)")
            from tensafe_trainer.storage.audit import AuditTrail

            try:
                generation, record = AuditTrail(home / "audit", store.keys).rotate_keys(args.tenant)
            except TGTinkerError as exc:
                print(f"error: the KEKs were rotated, but the audit, receipt and sealing keys were NOT: "
                      f"{type(exc).__name__}: {exc.message}", file=sys.stderr)
                return 1
            print(f"tenant {args.tenant}: audit, receipt and sealing keys replaced (generation {generation}); the old "
                  f"receipt signing key destroyed, its public key kept for receipts made before; the audit chain's "
                  f"old segment closed at sequence {record.sequence}; head now {record.sequence}:{record.record_hash}")
        elif args.artifact_command == "shred":
            if not args.yes:
                print("refusing to shred without --yes: the tenant's artifacts become unreadable forever",
                      file=sys.stderr)
                return 2
            removed = shred_tenant(_home(args), args.tenant)
            print(f"tenant {args.tenant}: keys deleted, {removed} files removed; its artifacts can no longer be "
                  "decrypted anywhere")
    except TGTinkerError as exc:
        print(f"error: {type(exc).__name__}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:  # an unreadable source, an unwritable --out
        print(f"error: {exc.strerror or type(exc).__name__}: {exc.filename}", file=sys.stderr)
        return 1
    return 0


def audit_command(args) -> int:
    path = args.path or _home(args, must_exist=False) / "audit" / f"{args.tenant}.jsonl"
    try:
        try:
            tenant, keys = _keys(args, args.tenant)
        except ValidationError as exc:
            if exc.details.get("field") != "keys" or args.keys:
                raise
            raise ValidationError(f"no audit key for tenant {args.tenant!r}: {exc.message}") from None
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
    ok, count, message = verify(path, keyset, expect)
    if ok and count == 0:  # an empty log proves nothing: never report it as a verified one
        print(f"error: {path} holds no audit entries (tenant {tenant!r}): nothing to verify", file=sys.stderr)
        return 1
    print(f"{path}: {message}")
    return 0 if ok else 1


def receipt_keys(path: Path):
    """What ``--public-key`` names, for verify_receipt: a PEM key, the tenant's receipt key list
    (``GET /v1/receipts/public_keys``), or the tenant's key set (a key-set file or key Secret export), turned into
    its key list, so that a key retired by a rotation verifies only the receipts made before it."""
    import json

    from tensafe_keys.store import receipt_public_keys_of

    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:  # nothing of the content is shown: the file may be a key set
        raise ValidationError(f"{path} is not UTF-8 text: not a PEM public key, a receipt key list or a key set",
                              {"field": "public_key"}) from None
    if "BEGIN" in text:
        return text
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("keys"), list):
        return doc
    _, keyset = load_keyset_file(path)
    if "receipt" not in keyset:
        raise ValidationError(f"the key set in {path} holds no receipt key", {"field": "public_key"})
    return receipt_public_keys_of(None, keyset)  # a plain file does not name its tenant (its name may not be it)


def receipt_command(args) -> int:
    from tg_tinker.receipts import verify_receipt

    source = Path(args.file)
    receipt_path = source / RECEIPT_FILE if source.is_dir() else source
    try:
        claims = verify_receipt(receipt_path, receipt_keys(args.public_key))
    except (TGTinkerError, OSError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    content = args.artifact or (source / "adapter_model.safetensors" if source.is_dir() else None)
    checks = [(content, "content_hash")] if content is not None else []
    if source.is_dir() and claims.get("adapter_config_hash"):
        checks.append((source / "adapter_config.json", "adapter_config_hash"))
    for path, claim in checks:
        try:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError as exc:
            print(f"error: {exc.strerror or type(exc).__name__}: {path}", file=sys.stderr)
            return 1
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
