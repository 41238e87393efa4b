"""Pixel work: rendering, its cache, transcoding and de-identification."""
