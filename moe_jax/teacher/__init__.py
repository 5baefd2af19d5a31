"""TeacherLM (hahaplus/TeacherLM): a teacher model writes rationales for multiple-choice training data, and a
student fine-tuned on the enhanced data is scored by option letters.

  prepare   `formats`: a dataset (CREAK, ECQA, StrategyQA, MMLU, or any registered format) -> prompt fields
  enhance   `enhance`: a teacher's batched, resumable, batch-independent generation of each row's rationale
  student   `student`: fine-tune a causal LM on one field of the enhanced rows (`moe_jax.training.loop.train`)
  evaluate  `evaluate`: option-letter accuracy of each student checkpoint, a table each, a plot over epochs
Command line: `python -m moe_jax.teacher {prepare,enhance,student,evaluate}`.
"""
