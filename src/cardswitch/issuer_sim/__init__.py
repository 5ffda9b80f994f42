"""cardswitch.issuer_sim"""
