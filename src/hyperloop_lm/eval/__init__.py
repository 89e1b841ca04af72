"""Evaluation: held-out perplexity, and zero-shot tasks through lm-evaluation-harness.

    perplexity.evaluate(model, shard, seq_len)            loss / ppl / bits-per-byte on token shards
    zeroshot.evaluate_tasks(checkpoint, "paper" | "offline" | "task,task", limit=...)
                                                          -> {tasks, task_acc, ...}; needs `[eval]`
    offline_tasks.run_offline_suite(checkpoint, limit=None)
                                                          the offline suite from the held-out split
    harness.HyperloopLM                                   the lm-eval adapter (`model="hyperloop"`)

Nothing here imports lm-eval until a zero-shot function is called.
"""
