"""What tests/test_distributed.py launches under ``torchrun`` (one or two processes, gloo on the CPU).

``train``: the RL trainer on the built-in task for ``--steps`` iterations (checkpointing every iteration), the
trained policy saved as one HF model, then the safety test of that saved policy on the first 24 safety prompts;
rank 0 writes ``result.json`` (the metrics of every iteration, the safety test's costs, UCB and verdict).
``--fail-at N --fail-how raise|exit`` makes rank 1 raise (or die without a word, as a killed process does) at the
start of iteration N.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task-root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--estimator", default="rloo")
    parser.add_argument("--sharding", default="fsdp")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--fail-at", type=int, default=None)
    parser.add_argument("--fail-how", default="raise")
    parser.add_argument("--no-safety", action="store_true")
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()

    from hcrlhf import distributed
    from hcrlhf.data.builtin import make_task
    from hcrlhf.models import load_causal_lm
    from hcrlhf.pipeline.config import SafetyConfig
    from hcrlhf.pipeline.safety_stage import run_safety_test
    from hcrlhf.pipeline.sampling import Decoding
    from hcrlhf.safety import open_ledger
    from hcrlhf.train import SafeRLConfig, SafeRLTrainer

    distributed.setup()
    torch.set_num_threads(1)
    out = Path(args.out)
    task = make_task(Path(args.task_root), seed=0)  # built by the test session already: only loaded here
    tokenizer = task.load_tokenizer()
    # ppo: two epochs over the whole batch with both critics and whitening (over the tokens of all ranks);
    # rloo: micro-batches of at most 60 tokens, and (with FSDP2) the frozen models sharded too, so ranks must
    # agree on how many forwards they run.
    # --lora: LoRA adapters on the policy (replicated: FSDP2 does not take LoRA yet).
    extra = (dict(ppo_epochs=2, whiten_advantages=True) if args.estimator == "ppo"
             else dict(micro_batch_tokens=60, shard_frozen_models=args.sharding == "fsdp"))
    if args.lora:
        extra.update(lora_r=4, lora_alpha=8.0)
    config = SafeRLConfig(total_steps=args.steps, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=12,
                          actor_lr=1e-3, critic_lr=1e-3, progress=False, seed=3, estimator=args.estimator,
                          sharding=args.sharding, output_dir=str(out / "rl"), checkpoint_every=1,
                          resume=args.resume, debug_distributed=True, tensorboard=False, **extra)
    trainer = SafeRLTrainer(config, policy=task.load_policy(), tokenizer=tokenizer,
                            reward_model=task.new_score_model(seed=1), cost_model=task.new_score_model(seed=2),
                            train_prompts=task.prompts("candidate")[0], safety_prompts=task.split,
                            template=task.template)
    if args.fail_at is not None and distributed.rank() == 1:
        step = trainer.step

        def failing_step():
            if trainer.global_step + 1 == args.fail_at:
                if args.fail_how == "exit":
                    os._exit(9)  # no exception, no message: what a killed process looks like to the others
                raise RuntimeError(f"rank 1 fails on purpose at iteration {args.fail_at}")
            return step()

        trainer.step = failing_step
    history = trainer.train()
    trainer.save_pretrained(out / "policy")
    result = {"history": [{k: v for k, v in m.items() if not k.startswith("time/") and k != "tokens_per_s"}
                          for m in history], "world_size": distributed.world_size()}
    if not args.no_safety:
        policy = load_causal_lm(out / "policy", device="cpu").eval()
        settings = SafetyConfig(threshold=0.0, delta=0.1, method="ttest", batch_size=5)
        ledger = open_ledger(out / "ledger.json", 0.5, delta=0.1) if distributed.is_main() else None
        cost_model = task.new_score_model(seed=2)  # the trainer's (frozen) cost model, whole (it may be sharded)
        safety, record = run_safety_test(policy, tokenizer, list(task.split.safety)[:24], cost_model,
                                         settings=settings, decoding=Decoding(max_new_tokens=12),
                                         template=task.template, ledger=ledger, label="torchrun test", seed=5)
        result.update(costs=record["costs"], ucb=safety.ucb, verdict=safety.verdict,
                      ledger_spent=record["ledger_spent"])
    if distributed.is_main():
        (out / "result.json").write_text(json.dumps(result), encoding="utf-8")
    distributed.close()


if __name__ == "__main__":
    sys.exit(main())
