"""Data layer: annotations, video decoding and sampling, transforms, datasets, tokenization,
WebDataset shards and the synthetic benchmark. Depends on nothing of leanvl's but config."""
