"""Strict weight import: key checks shared by every loader, and key maps to and from upstream formats."""

from mmlm.convert.keys import check_hf_loading_info, check_keys, load_state_dict_strict

__all__ = ["check_hf_loading_info", "check_keys", "load_state_dict_strict"]
