CREATE TABLE orders (id bigint PRIMARY KEY, note text NOT NULL);
INSERT INTO orders VALUES (1, 'made by the init script');
