"""Model definitions rebuilt from published weight files (dlib ResNet, MiniFASNet)."""
