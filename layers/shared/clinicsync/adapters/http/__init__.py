"""Adapters: http"""
