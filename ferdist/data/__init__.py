"""Data: FER2013 in, shards out, batches to the device.

Readers of the sources (Kaggle CSV, image folders), image conversion, the WebDataset shard format (`shards`, the one
module that knows the tar layout), the sharder, the shard loader that every worker streams through, the SYNTHETIC
faces, and the batched on-device transforms.

May import: the shared ground only (`ferdist.config`, `errors`, `constants`, `storage`, `outage`, `metrics`,
`console`). Every other stage sits above it.
"""
