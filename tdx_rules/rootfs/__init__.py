"""Root filesystems from container images: image formats, layer readers, the merged tree, ext4."""
