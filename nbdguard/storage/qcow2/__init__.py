"""The qcow2 format driver: header, host file access, refcounts, mapping and the image."""
