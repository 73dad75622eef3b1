"""Interpretability of TopK LMs (the paper's Sections 3-5) on any converted model or training run:

    data      token windows from prepared shards or text
    stats     one streaming pass: per-token mean activation, firing, top contexts (sparse for TopK layers)
    entropy   token and semantic entropy of every neuron
    concepts  labels from top tokens, scored against the synthetic corpus's topics
    report    neuron reports      steer    concept steering      trace    over checkpoints
    plots     the paper's figures browse   a static HTML neuron browser
    export    Neuronpedia's import layout; TopK layers as sparsify / SAELens SAEs
"""
