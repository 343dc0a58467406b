"""Face detection and 5-point similarity alignment to the 112x112 ArcFace template."""
