"""Adapters: medods"""
