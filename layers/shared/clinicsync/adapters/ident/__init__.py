"""Adapters: ident"""
