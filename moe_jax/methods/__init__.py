"""Methods that combine trained experts: concatenation into one MoE file, Merged Experts and merging (uniform means,
TIES), Average Activation and Arrow router vectors, retrieval routing, Model-Based Clustering. Each works on plain
parameter trees, expert files or an expert library; none imports TensorFlow."""
