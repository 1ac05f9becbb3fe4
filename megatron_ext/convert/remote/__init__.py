"""Modelling code shipped inside exported HF directories (`auto_map`, trust_remote_code)."""
