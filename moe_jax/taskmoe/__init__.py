"""The task-level mixture-of-experts (Ye, Zha & Ren 2022; seed INK-USC/CrossTaskMoE) around the model of
`moe_jax.models.taskmoe`: task ids for seqio tasks (`tasks`), the two training stages (`stages`, `stage2`),
task embeddings (`embeddings`), evaluation with routing analysis (`evaluate`, `analysis`), few-shot transfer
(`few_shot`) and the built-in demo (`demo`). Submodules are imported where used; this package imports nothing."""
