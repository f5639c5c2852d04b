"""Facts about FER2013 that every module agrees on.

Class order is the Kaggle `emotion` column's (Goodfellow et al. 2013, "Challenges in Representation Learning");
it is a tested invariant because shards, checkpoints and registered models all store class *indices*.
"""

FER_CLASSES: tuple[str, ...] = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
NUM_CLASSES = len(FER_CLASSES)

FACE_SIDE = 48
"""FER2013 faces are 48x48 grayscale."""
FACE_PIXELS = FACE_SIDE * FACE_SIDE

SPLITS: tuple[str, ...] = ("train", "val", "test")
UNLABELED_SPLIT = "unlabeled"
"""The split of faces without labels (``jobs/shard.py --unlabeled``): only MAE pretraining reads it. Its class
counts are all zero and its shards' ``.cls`` entries are placeholders that no labelled reader ever serves."""
PRETRAIN_SPLITS: tuple[str, ...] = ("train", UNLABELED_SPLIT)
"""What pretraining reads of every manifest it is given; val and test are held out for the fine-tuned model."""
KAGGLE_USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MANIFEST_NAME = "manifest.json"
DEFAULT_SAMPLES_PER_SHARD = 64
"""jobs/shard.py's samples per tar: FER2013 train → 449 shards, 7 per rank even at 64 GPUs."""
SYNTHETIC_DEFAULT_ROWS = 3000
"""jobs/shard.py's size of the generated SYNTHETIC set."""
SHARD_FORMAT = "ferdist-fer-shards"
SHARD_FORMAT_VERSION = 1
