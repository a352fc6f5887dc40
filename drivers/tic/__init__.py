"""Enedis Linky TIC (télé-information client) driver: historic and standard modes."""
