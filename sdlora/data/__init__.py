"""The dataset: open images safely, tag them, read subsets and buckets, build the manifest."""
