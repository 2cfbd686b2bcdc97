"""tinker-cookbook recipes, unchanged, from their own entry points, against ``tensafe serve``."""

from __future__ import annotations

import asyncio
import json

import pytest

from tinker_helpers import POLICY, artifact_state
from tinker_helpers import start_tinker_trainer

pytest.importorskip("tinker_cookbook")


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):  # noqa: F811
    trainer = start_tinker_trainer(tmp_path_factory.mktemp("cookbook-home"), POLICY,
                                   tenants=("plain", "private", "tight", "rl-private", "rl-tight"))
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


def rl_config(server, tenant: str, model_dir, tmp_path, monkeypatch, loss_fn: str, batches: int = 2):  # noqa: F811
    """The cookbook's RL recipe on its own ProblemEnv: a reward (an even number of characters in the reply) that a
    random model's rollouts disagree on, so advantages are not all zero and the recipe really trains."""
    import chz
    from functools import partial

    from tinker_cookbook import renderers
    from tinker_cookbook.rl import train
    from tinker_cookbook.rl.problem_env import ProblemEnv, ProblemGroupBuilder
    from tinker_cookbook.rl.types import RLDataset, RLDatasetBuilder
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    class EvenReply(ProblemEnv):
        def __init__(self, index: int, renderer):
            super().__init__(renderer, None, require_stop_sequence_for_format=False)
            self.index = index

        def get_question(self) -> str:
            return f"Say something of even length, number {self.index}."

        def check_answer(self, sample_str: str) -> bool:
            return len(sample_str) % 2 == 0

        def check_format(self, sample_str: str) -> bool:
            return True

        def get_reference_answer(self) -> str:
            return "ok"

    class EvenReplies(RLDataset):
        def __init__(self, renderer):
            self.renderer = renderer

        def get_batch(self, index: int):
            return [ProblemGroupBuilder(env_thunk=partial(EvenReply, 2 * index + g, self.renderer), num_envs=4)
                    for g in range(2)]

        def __len__(self) -> int:
            return batches

    @chz.chz
    class EvenRepliesBuilder(RLDatasetBuilder):
        async def __call__(self):
            renderer = renderers.get_renderer("role_colon", tokenizer=get_tokenizer(str(model_dir)))
            return EvenReplies(renderer), None

    monkeypatch.setenv("TINKER_API_KEY", server.keys[tenant])
    return train, train.Config(
        learning_rate=1e-2, dataset_builder=EvenRepliesBuilder(), model_name=str(model_dir), recipe_name="tensafe_rl",
        max_tokens=6, log_path=str(tmp_path / "log"), eval_every=0, save_every=1, renderer_name="role_colon",
        lora_rank=4, base_url=server.base_url, loss_fn=loss_fn)


@pytest.mark.parametrize("tenant", ["plain", "rl-private"])  # under DP with its groups of 4 declared
@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo"])
def test_rl_train_main_runs_unchanged(server, model_dir, tmp_path, monkeypatch, tenant, loss_fn):  # noqa: F811
    train, config = rl_config(server, tenant, model_dir, tmp_path, monkeypatch, loss_fn)
    asyncio.run(train.main(config))
    steps = [m for m in metrics(tmp_path / "log") if "optim/kl_sample_train_v1" in m]
    assert [m["step"] for m in steps] == [1.0, 2.0]
    for m in steps:  # the cookbook's own sampler/trainer KL: the same weights score the same tokens alike here
        assert abs(m["optim/kl_sample_train_v1"]) < 1e-4 and m["optim/kl_sample_train_v2"] < 1e-6
        assert m["env/all/total_episodes"] == 8
    # Only a group whose rewards differ has nonzero advantages. A group of four agrees with probability 1/8, so
    # all four groups of the run agree with probability (1/8)**4 ~ 2e-4: this line is the test's only chance.
    assert sum(m["env/all/by_group/frac_mixed"] for m in steps) > 0
    saved = [json.loads(line) for line in (tmp_path / "log" / "checkpoints.jsonl").read_text().splitlines()]
    final = artifact_state(server, tenant, saved[-1]["state_path"])["trainable"]
    assert any(v.abs().sum() > 0 for n, v in final.items() if "lora_B" in n)  # LoRA B starts at zero: it moved
    epsilons = [m.get("dp/epsilon") for m in steps]
    if tenant == "rl-private":  # one unit per group of 4: a step's update moved by at most 2 clipped groups
        assert all(e is not None and e > 0 for e in epsilons) and epsilons == sorted(epsilons)
        assert all(m["dp/group_size"] == 4.0 and m["dp/num_examples"] == 8.0 for m in steps)
        assert all(m["dp/num_clipped"] <= 2.0 for m in steps)
    else:
        assert epsilons == [None, None]


def test_rl_train_main_stops_at_the_budget(server, model_dir, tmp_path, monkeypatch):  # noqa: F811
    import tinker

    train, config = rl_config(server, "rl-tight", model_dir, tmp_path, monkeypatch, "ppo", batches=3)  # 2.17, 3.19
    with pytest.raises(tinker.RequestFailedError, match="budget"):
        asyncio.run(train.main(config))


def dpo_config(server, tenant: str, model_dir, tmp_path, monkeypatch):  # noqa: F811
    from tinker_cookbook.preference import train_dpo
    from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
    from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    rows = [{"comparison": {"prompt_conversation": [{"role": "user", "content": f"Name a number near {i}."}],
                            "completion_A": [{"role": "assistant", "content": str(i + 1)}],
                            "completion_B": [{"role": "assistant", "content": "no"}]},
             "label": "A"} for i in range(8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("TINKER_API_KEY", server.keys[tenant])
    common = ChatDatasetBuilderCommonConfig(model_name_for_tokenizer=str(model_dir), renderer_name="role_colon",
                                            max_length=64, batch_size=4)
    return train_dpo, train_dpo.Config(
        log_path=str(tmp_path / "log"), model_name=str(model_dir), recipe_name="tensafe_dpo",
        renderer_name="role_colon", base_url=server.base_url, learning_rate=1e-3, lora_rank=4, save_every=0,
        eval_every=0, num_epochs=1,
        dataset_builder=DPODatasetBuilderFromComparisons(
            comparison_builder=ComparisonBuilderFromJsonl(train_path=str(tmp_path / "pairs.jsonl")),
            common_config=common))


def test_train_dpo_runs_unchanged(server, model_dir, tmp_path, monkeypatch):  # noqa: F811
    train_dpo, config = dpo_config(server, "plain", model_dir, tmp_path, monkeypatch)
    train_dpo.main(config)
    steps = [m for m in metrics(tmp_path / "log") if "dpo_loss" in m]
    assert len(steps) == 2
    # The first step's policy is the reference (a fresh LoRA is the identity): DPO's loss is log 2 exactly.
    assert steps[0]["dpo_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert steps[1]["dpo_loss"] < steps[0]["dpo_loss"]  # the chosen completions gained on the rejected ones


def test_train_dpo_is_refused_under_dp(server, model_dir, tmp_path, monkeypatch):  # noqa: F811
    import tinker

    train_dpo, config = dpo_config(server, "private", model_dir, tmp_path, monkeypatch)
    with pytest.raises(tinker.UnprocessableEntityError, match="forward_backward_custom is refused under DP"):
        train_dpo.main(config)
