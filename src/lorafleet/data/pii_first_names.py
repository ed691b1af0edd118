"""Given names that the offline name route of `pii` knows (German, French and English).

Compiled for this package from common given names; a list of names is a list of facts, under the
package's own licence. A name here followed by a capitalised word is read as a person's name
("Anna Schmidt"); words that are names and ordinary words too (April, Mark, Will, Frank, Christian,
Rose, Grace) are left out, as a capitalised ordinary word would then take the word after it along.
"""

FIRST_NAMES = frozenset(
    """
    Aaron Abigail Adam Adele Adrian Adrien Agathe Agnes Agnès Aidan Alain Alan Albert Alex Alexander Alexandra
    Alexandre Alexis Alfred Alice Alicia Aline Alison Amanda Amandine Amelia Amy Amélie Anaïs Andrea Andreas Andrew
    Andrzej Angela Angelika Anja Anke Ann Anna Anne Annette Annika Anthony Antoine Anton Antonia Arnaud Arthur
    Astrid Audrey Aurélie Axel Baptiste Barbara Bastian Beate Beatrice Ben Benedikt Benjamin Benoît Bernadette
    Bernard Bernd Bertrand Bettina Birgit Björn Brian Brigitte Bruno Camille Carla Carmen Carol Caroline Carolyn
    Carsten Catherine Charles Charlotte Chloe Chloé Christa Christel Christiane Christina Christine Christoph
    Christophe Christopher Claude Claudia Clément Colin Constance Corinna Cornelia Cécile Céline Damien Daniel
    Daniela Danielle David Deborah Denis Denise Dennis Diana Diane Didier Dieter Dietmar Dirk Dominik Dominique
    Doris Dorothea Dorothy Edith Edward Eleanor Elena Elias Elisabeth Elizabeth Elke Ella Ellen Eloïse Emil Emilia
    Emilie Emily Emma Emmanuel Emmanuelle Eric Erik Erika Ernst Esther Eva Eve Fabian Fabien Fabienne Fabrice Felix
    Finn Fiona Florent Florian Franz Franziska François Françoise Frederick Frieda Friedrich Frédéric Gabriel
    Gabriele Gary Gaston Gaëlle Geoffrey Georg George Georges Gerald Gerda Gerhard Gertrud Gilbert Gilles Gisela
    Giselle Gregor Gregory Grégoire Gudrun Guillaume Gustav Gérard Günter Günther Hanna Hannah Hannelore Hans Harald
    Harry Hartmut Heike Heinrich Heinz Helen Helena Helene Helga Helmut Henri Henry Herbert Hermann Hildegard Holger
    Hubert Hugo Hugues Hélène Ian Ida Ilse Ines Ingo Ingrid Irene Iris Isabel Isabella Isabelle Jack Jacob
    Jacqueline Jacques Jakob James Jan Jana Jane Janet Janine Jason Jean Jeanne Jennifer Jens Jessica Joachim Joanna
    Jochen Johann Johanna Johannes John Jonas Jonathan Josef Joseph Joshua Joséphine Judith Julia Julian Julie
    Julien Juliette Justine Jérémy Jérôme Jörg Jürgen Karen Karin Karl Karola Katharina Kathrin Katja Katrin Kelly
    Kerstin Kevin Klaus Konrad Kristina Kurt Lara Larissa Laura Laure Laurence Laurent Lea Lena Leon Leonie Lisa
    Lise Lotte Louis Louise Luc Luca Lucas Lucie Lucy Ludwig Luise Lukas Léa Léo Léon Magali Magdalena Maja Manfred
    Manon Manuel Manuela Marc Marcel Margaret Margarete Margot Maria Marianne Marie Marie-Claire Marion Marius
    Markus Marlene Marta Martha Martin Martina Martine Mary Mathias Mathieu Mathilde Matthew Matthias Maurice Max
    Maxime Maximilian Melanie Michael Michaela Michel Michelle Michèle Mike Mila Monika Monique Mélanie Nadine Nadja
    Natalie Nathalie Nathan Nicolas Nicole Niklas Nils Noah Norbert Noémie Océane Olga Oliver Olivia Olivier Oscar
    Oskar Otto Pascal Pascale Patricia Patrick Paul Paula Pauline Peter Petra Philipp Philippe Pierre Rachel Rainer
    Ralf Raphaël Raymond Rebecca Regina Reinhard Renate René Richard Robert Roger Roland Romain Rosa Rudolf Ruth
    Sabine Sabrina Samuel Sandra Sara Sarah Sascha Sebastian Simon Simone Sophia Sophie Stefan Stefanie Steffen
    Stephan Stephanie Stephen Steven Stéphane Stéphanie Susan Susanne Sven Sylvie Sébastien Theo Thierry Thomas
    Thorsten Thérèse Tim Timo Timothy Tobias Tom Torsten Ulrich Ulrike Ursula Uta Ute Uwe Valentin Valérie Vanessa
    Victor Victoria Vincent Virginie Véronique Walter Werner William Wolfgang Yann Yannick Yves Yvonne Zoe Zoé Élise
    Émilie Éric Étienne
    """.split()
)
