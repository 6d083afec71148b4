"""Adapters: renovatio"""
