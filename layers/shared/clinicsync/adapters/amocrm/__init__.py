"""Adapters: amocrm"""
