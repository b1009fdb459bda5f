"""The initramfs: the newc writer, deterministic packing, parallel gzip, and the reader."""
