"""Data in: sources (registry downloads, embedded digits, TFDS, image files), the validation split, preprocessing (standardise, ZCA) and the prepared arrays every stage reads."""
