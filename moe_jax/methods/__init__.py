"""Methods that combine trained experts: concatenation into one MoE file, Merged Experts, Average Activation router
vectors and retrieval routing. Each works on plain parameter trees and expert files; none imports TensorFlow."""
