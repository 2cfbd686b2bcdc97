"""What the Tinker door keeps of its names (service/tinker/registry.py)."""

from __future__ import annotations


def test_an_artifact_named_like_a_tinker_checkpoint_by_a_v1_client_is_not_listed_as_one():
    """The second attacker review: a /v1 client saved ``tinker://run/weights/x`` with metadata ``{"tinker": "x"}``,
    and every Tinker listing of its tenant answered 500."""
    from tg_tinker.types import ArtifactInfo

    from tensafe_trainer.service.tinker.registry import TinkerRegistry

    def artifact(name, metadata):
        return ArtifactInfo(artifact_id=f"a-{len(name)}-{len(str(metadata))}", tenant_id="t", training_client_id="c",
                            kind="checkpoint", size_bytes=1, content_hash="h", created_at=1.0, step=0, key_id="k",
                            metadata=metadata, name=name)

    real = artifact("tinker://run/weights/ok", {"tinker": {"base_model": "m"}})
    forged = [artifact("tinker://run/weights/x", {"tinker": "x"}), artifact("tinker://broken", {"tinker": {}}),
              artifact("tinker://run/weights/y", {})]
    assert TinkerRegistry().index("t", [real, *forged]) == {real.name: real}
