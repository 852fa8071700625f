"""GRPO: reinforcement learning on image rewards, with trl's `GRPOTrainer` inside a Ray Train worker.

One idea per module: `config` (the stage's settings, the task pickled to workers), `rollout` (trl's
trainer with images as completions), `logps` (log-probs under the sampler's distribution), `trainer`
(the worker: trl's arguments from the shared `train:` block, resume, evaluation), `reporting`
(checkpoints and metrics rows in the shared layout), `eval` (the held-out comparison), `prompts`,
and `stage` (the body `stages/grpo.py` registers).

Ray Train runs the worker (`simplear.train.fit`); every `checkpoint_every` steps trl's checkpoint
(optimizer, scheduler, RNG, trainer state) is reported together with a SimpleAR checkpoint of the
policy, so a rerun resumes where a killed one stopped. Per step: reward mean/std (and per reward),
KL, clip fraction, entropy, loss to the log, metrics.jsonl, TensorBoard and `ray.train.report`.
At the end, rank 0 compares the SFT model and the trained policy on held-out prompts and writes
eval.json; the stage draws reward_curve.png.

Outputs: final/ (the policy), metrics.jsonl, tensorboard/, reward_curve.png, eval.json, samples*.png.
"""
