"""Adapters: lis"""
