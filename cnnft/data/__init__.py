"""Images in: class folders and samples, packaged sets, decoding, transforms, class balance and
mixing. Imports :mod:`cnnft.models` (preprocessing), config and errors; nothing above."""
