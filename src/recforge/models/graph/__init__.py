"""Graph collaborative filtering: LightGCN, SGL, SimGCL (with SGCL's symmetric contrastive loss)
and the signed-graph LSGRec, on the user-item bipartite graph of the training interactions."""
