"""The learner: `engine` (a DeepSpeed engine with SFT / GRPO steps, checkpoints, export; no Ray) and
`actor` (its ranks as Ray actors, grouped into one data-parallel process group).

Nothing is imported here, so that `import apr_ray.learner.engine` does not pull in Ray.
"""
