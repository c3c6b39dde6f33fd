"""Graph passes on the captured step graph, one per file (installed as `tocache_fx.passes`).

Analyses (the graph is left unchanged):
    find_branches     the residual branches `x = x + g * f(...)` of the token stream
    token_axis        whether a branch is token-wise, and the token axis of each node

Rewrites (on a copy of the graph, for one step plan):
    attention_scores  at FULL steps, the token scores later PARTIAL steps select by
    cache_branches    each residual branch in its cache-aware form (FULL, REUSE, PARTIAL)
    skip_blocks       DuCa's AGGRESSIVE step (all blocks skipped) and the slot it reads
    fuse_scored_attention  a scored CPU float32 attention and its score from one softmax
    narrow_linears    a linear whose output chunks a step partly leaves unused computes
                      only the used ones (adaLN modulation at REUSE steps)

Helper:
    state             `GraphState`: cache slots as graph inputs and outputs
"""
