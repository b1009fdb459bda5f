"""Offline prediction of Intel TDX measurement registers (MRTD from the TDVF metadata of OVMF)."""
