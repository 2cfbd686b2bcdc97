"""tinker-cookbook recipes, unchanged, from their own entry points, against ``tensafe serve``."""

from __future__ import annotations

import asyncio
import json

import pytest

from test_tinker import POLICY, model_dir  # noqa: F401 - the shared model fixture
from tinker_helpers import start_tinker_trainer

pytest.importorskip("tinker_cookbook")


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):  # noqa: F811
    trainer = start_tinker_trainer(tmp_path_factory.mktemp("cookbook-home"), POLICY,
                                   tenants=("plain", "private", "tight"))
    yield trainer
    trainer.trainer.close()


def conversations(path, count: int = 16):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                                     {"role": "assistant", "content": str(2 * i)}]}) + "\n"
                            for i in range(count)))
    return path


def sl_config(server, tenant: str, model_dir, tmp_path, monkeypatch):  # noqa: F811
    from tinker_cookbook.supervised import train
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    monkeypatch.setenv("TINKER_API_KEY", server.keys[tenant])
    common = ChatDatasetBuilderCommonConfig(model_name_for_tokenizer=str(model_dir), renderer_name="role_colon",
                                            max_length=64, batch_size=4)
    return train, train.Config(
        recipe_name="tensafe_sl", log_path=str(tmp_path / "log"), model_name=str(model_dir),
        renderer_name="role_colon", base_url=server.base_url, learning_rate=1e-3, lora_rank=4, save_every=2,
        eval_every=0, num_epochs=1,
        dataset_builder=FromConversationFileBuilder(file_path=str(conversations(tmp_path / "c.jsonl")),
                                                    common_config=common))


def metrics(log_path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("tenant", ["plain", "private"])
def test_supervised_train_main_runs_unchanged(server, model_dir, tmp_path, monkeypatch, tenant):  # noqa: F811
    train, config = sl_config(server, tenant, model_dir, tmp_path, monkeypatch)
    asyncio.run(train.main(config))
    steps = metrics(tmp_path / "log")
    assert [m["step"] for m in steps] == [1.0, 2.0, 3.0, 4.0]
    assert all(m["train_mean_nll"] > 0 for m in steps)
    saved = [json.loads(line) for line in (tmp_path / "log" / "checkpoints.jsonl").read_text().splitlines()]
    assert [s["name"] for s in saved] == ["000002", "final"]
    assert all(s["state_path"].startswith("tinker://") for s in saved)
    epsilons = [m.get("dp/epsilon") for m in steps]
    if tenant == "private":  # DP from the server's policy, reported in the recipe's own metrics
        assert all(e is not None and e > 0 for e in epsilons) and epsilons == sorted(epsilons)
    else:
        assert epsilons == [None] * 4


def test_supervised_train_main_stops_at_the_budget(server, model_dir, tmp_path, monkeypatch):  # noqa: F811
    import tinker

    train, config = sl_config(server, "tight", model_dir, tmp_path, monkeypatch)
    with pytest.raises(tinker.RequestFailedError, match="budget"):
        asyncio.run(train.main(config))
