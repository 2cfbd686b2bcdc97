"""``tensafe demo``: fine-tune SmolLM2-135M with LoRA through the SDK on the bundled dataset.

Everything goes through ``tg_tinker`` and the embedded local trainer, exactly as a user's script
would: sample before, train with a progress bar, sample after, save an encrypted checkpoint,
export the adapter, write the loss curve, and say where everything is.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional

from tg_tinker import DPConfig, LoRAConfig, OptimizerConfig, ServiceClient, TrainingConfig

from tensafe_trainer.engine.models import load_tokenizer

QUESTIONS = ["What is the mascot of TenSafe?", "How are TenSafe checkpoints stored?"]
BATCH = 8


def load_dataset() -> list[dict]:
    text = resources.files("tensafe_trainer.cli").joinpath("data/tensafe_facts.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def encode_example(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with the loss on the answer only; labels are already shifted."""
    prompt = tokenizer.encode(chat_prompt(tokenizer, row["question"]), add_special_tokens=False)
    answer = tokenizer.encode(row["answer"] + tokenizer.eos_token, add_special_tokens=False)
    full = prompt + answer
    labels = [-100] * (len(prompt) - 1) + answer
    return full[:-1], labels


def make_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    width = max(len(ids) for ids, _ in examples)
    return {
        "input_ids": [ids + [pad_id] * (width - len(ids)) for ids, _ in examples],
        "attention_mask": [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in examples],
        "labels": [labels + [-100] * (width - len(labels)) for _, labels in examples],
    }


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean NLL per answer token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sample_answers(sampler, tokenizer) -> dict[str, str]:
    futures = {q: sampler.sample(chat_prompt(tokenizer, q), max_tokens=40, temperature=0.0) for q in QUESTIONS}
    return {q: f.result().text.strip() for q, f in futures.items()}


def run_demo(steps: int = 30, out: Path = Path("out/demo"), dp: bool = False, model_ref: str = "smollm2-135m",
             home: Optional[Path] = None) -> int:
    from tqdm import tqdm

    if importlib.util.find_spec("matplotlib") is None:  # checked first: a finished run must not fail at its plot
        print("tensafe demo plots its loss curve with matplotlib, which the trainer image leaves out: "
              "pip install 'tensafe[demo]' (make setup installs it)", file=sys.stderr)
        return 2
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"TenSafe demo: LoRA fine-tune of {model_ref} on {steps} steps{' with DP-SGD' if dp else ''}")
    tokenizer = load_tokenizer(model_ref)
    rows = load_dataset()
    examples = [encode_example(tokenizer, r) for r in rows]
    config = TrainingConfig(
        model_ref=model_ref, batch_size=BATCH, max_seq_len=256, seed=0,
        lora_config=LoRAConfig(rank=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"]),
        optimizer=OptimizerConfig(learning_rate=2e-3 if not dp else 5e-3, warmup_steps=3),
    )
    rng = random.Random(0)
    with ServiceClient(home=home) as service:
        print(f"trainer: local, {service.base_url} (same server a Kubernetes trainer pod runs)")
        dp_config = None
        if dp:
            # The server samples the logical batches (Poisson, q = batch / dataset) from the encrypted copy it
            # keeps, so the amplification in epsilon is the server's to certify; the budget sets the noise.
            dataset = service.register_dataset([{"input_ids": ids, "labels": labels} for ids, labels in examples])
            print(f"dataset  : {dataset.dataset_id}, {dataset.num_examples} examples, stored encrypted")
            dp_config = DPConfig(target_epsilon=8.0, target_delta=1e-3, planned_steps=steps, max_grad_norm=1.0,
                                 dataset_id=dataset.dataset_id, sample_rate=BATCH / len(examples))
        config = config.model_copy(update={"dp_config": dp_config})
        tc = service.create_training_client(config)
        sampler = tc.create_sampling_client()
        before = sample_answers(sampler, tokenizer)
        losses, epsilons = [], []
        order: list[int] = []
        bar = tqdm(range(steps), desc="training", unit="step")
        for _ in bar:
            if dp:
                fb = tc.forward_backward_sampled()
            else:
                if len(order) < BATCH:
                    order += rng.sample(range(len(examples)), len(examples))
                picked, order = order[:BATCH], order[BATCH:]
                fb = tc.forward_backward(make_batch([examples[i] for i in picked], tokenizer.pad_token_id or 0))
            opt = tc.optim_step()
            losses.append(fb.result().loss)
            result = opt.result()
            postfix = {"loss": f"{losses[-1]:.3f}", "lr": f"{result.learning_rate:.1e}"}
            if result.dp_metrics:
                epsilons.append(result.dp_metrics.total_epsilon)
                postfix["eps"] = f"{epsilons[-1]:.2f}"
                postfix["batch"] = fb.result().num_examples
            bar.set_postfix(postfix)
        after = sample_answers(sampler, tokenizer)
        checkpoint = tc.save_state(metadata={"demo": True, "steps": steps, "final_loss": losses[-1]})
        encrypted = out / "checkpoint.tsa"
        encrypted.write_bytes(service.pull_artifact(checkpoint.artifact_id))
        audit = service.get_audit_logs(training_client_id=tc.id, limit=1000)
    title = f"{model_ref} LoRA{' + DP-SGD' if dp else ''}"
    plot_losses(losses, out / "loss_curve.png", title)
    summary = {"model": model_ref, "steps": steps, "first_loss": losses[0], "final_loss": losses[-1],
               "total_epsilon": epsilons[-1] if epsilons else None, "checkpoint": checkpoint.model_dump(mode="json"),
               "samples_before": before, "samples_after": after, "audit_entries": len(audit),
               "seconds": round(time.time() - started, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\nBefore fine-tuning:")
    for q, a in before.items():
        print(f"  Q: {q}\n  A: {a}")
    print("After fine-tuning:")
    for q, a in after.items():
        print(f"  Q: {q}\n  A: {a}")
    print(f"\nloss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps" +
          (f", epsilon {epsilons[-1]:.2f} (delta {dp_config.target_delta:g}, Poisson sampling on the server)"
           if epsilons else ""))
    print(f"encrypted checkpoint : {checkpoint.artifact_id} ({checkpoint.size_bytes} bytes, "
          f"{checkpoint.encryption.algorithm}, key {checkpoint.encryption.key_id})")
    print(f"  ciphertext copy    : {encrypted}")
    print(f"loss curve           : {out / 'loss_curve.png'}")
    print(f"summary              : {out / 'summary.json'}")
    print(f"audit log            : {len(audit)} entries for {tc.id}; verify with `tensafe audit verify`")
    print(f"done in {summary['seconds']} s")
    return 0
