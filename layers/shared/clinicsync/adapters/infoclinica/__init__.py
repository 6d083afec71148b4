"""Adapters: infoclinica"""
