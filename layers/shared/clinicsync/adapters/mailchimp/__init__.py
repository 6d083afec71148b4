"""Adapters: mailchimp"""
