"""Everything that brings inputs in: source specs, downloads, the download cache, .deb packages."""
