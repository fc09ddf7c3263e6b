"""Records -> prompts: the strict record schema, percentile buckets for counts, the prompt builder,
and the MovieLens adapter (examples/ holds a complete post and member)."""
