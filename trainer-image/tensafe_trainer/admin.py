"""``tensafe artifact ...`` and ``tensafe audit verify``: offline tools over a trainer's data folder."""

from __future__ import annotations

import sys
from pathlib import Path

from tg_tinker.errors import TGTinkerError

from .artifacts import ArtifactStore
from .audit import verify
from .keys import LocalKeyProvider
from .paths import keys_dir, tensafe_home


def open_store(home: Path | None) -> ArtifactStore:
    home = home or tensafe_home()
    return ArtifactStore(home / "artifacts", LocalKeyProvider(keys_dir(home)))


def export_adapter_folder(store: ArtifactStore, tenant: str, artifact_id: str, out: Path) -> list[str]:
    """Decrypt a checkpoint or sampler artifact and write it as a PEFT adapter folder."""
    from tg_tinker.config import TrainingConfig

    from .engine import TrainingEngine, deserialize_state

    state = deserialize_state(store.get(tenant, artifact_id))
    config = TrainingConfig.parse(state["config"]).model_copy(update={"dp_config": None})
    engine = TrainingEngine(config)
    engine.load_weights(state)
    out.mkdir(parents=True, exist_ok=True)
    return engine.export_adapter(out)


def artifact_command(args) -> int:
    store = open_store(args.home)
    try:
        if args.artifact_command == "list":
            for info in store.list(args.tenant):
                print(f"{info.artifact_id}  {info.kind:10}  step {info.step:6}  {info.size_bytes:12} B  "
                      f"{info.training_client_id}  key {info.key_id}")
        elif args.artifact_command == "decrypt":
            args.out.write_bytes(store.get(args.tenant, args.artifact_id))
            print(f"decrypted {args.artifact_id} -> {args.out} (a torch checkpoint: load with weights_only=True)")
        elif args.artifact_command == "export":
            files = export_adapter_folder(store, args.tenant, args.artifact_id, args.out)
            print(f"exported {args.artifact_id} -> {args.out}: {', '.join(files)}")
        elif args.artifact_command == "rotate":
            print(f"tenant {args.tenant}: new key {store.rotate(args.tenant)}; every data key re-wrapped")
        elif args.artifact_command == "shred":
            if not args.yes:
                print("refusing to shred without --yes: the tenant's artifacts become unreadable forever",
                      file=sys.stderr)
                return 2
            store.keys.shred(args.tenant)
            print(f"tenant {args.tenant}: keys deleted; its artifacts can no longer be decrypted")
    except TGTinkerError as exc:
        print(f"error: {type(exc).__name__}: {exc.message}", file=sys.stderr)
        return 1
    return 0


def audit_command(args) -> int:
    path = args.path or tensafe_home() / "audit" / "audit.jsonl"
    ok, count, message = verify(path)
    print(f"{path}: {message}")
    return 0 if ok else 1
